"""The HTTP front end: the BentoML service class, TF Serving's REST API, the model list, middleware."""
