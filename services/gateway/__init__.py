"""The gateway: the OpenAI-compatible HTTP API in front of the cluster.

It validates requests, applies the chat template, tokenizes, submits each request to the
scheduler over NATS, and turns the token events the backend publishes back into text, as JSON
or server-sent events. See `app.py` for the routes and `serving.py` for one request's life.
"""
