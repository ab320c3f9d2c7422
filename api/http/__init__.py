"""The API's HTTP server: uvicorn's configuration, the HTTP/1.1 limits enforced below the
ASGI app, and the access log."""
