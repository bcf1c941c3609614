"""Load tests of the cnnkit service: locust users (``locustfile.py``), ``cnnkit loadtest`` and its report."""
