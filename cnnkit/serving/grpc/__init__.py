"""The gRPC front end: TF Serving's PredictionService and ModelService, health, and JSON extensions."""
