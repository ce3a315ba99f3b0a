"""The ingress process: the OpenAI-compatible HTTP API (FastAPI, no Ray) in front of an engine
client, and `serve_app.py`, the Serve application that wires it to the model replicas."""
