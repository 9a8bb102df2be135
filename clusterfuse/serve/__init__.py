"""`clusterfuse serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncLLM`.

``protocol`` holds the request/response models and the OpenAI-style error, ``metrics`` the
Prometheus metrics, ``app`` the routes, ``cli`` the command that builds the engine and runs
uvicorn.  Needs the ``serve`` extra: ``pip install 'clusterfuse[serve]'``.
"""
