"""`deepsail serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

from deepsail.serve import create_app, load_served, ServerConfig
app = create_app(lambda: load_served("runs/base"), ServerConfig(api_key="..."))
"""

from deepsail.serve.app import Served, ServerConfig, create_app, load_served

__all__ = ["Served", "ServerConfig", "create_app", "load_served"]
