"""flux2-local's HTTP side: the only package that imports FastAPI and Starlette."""
