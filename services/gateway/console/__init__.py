"""The operator's console at `/ui`, and `/v1/docs` served offline.

Pages are Jinja2 templates rendered by the gateway (layout, navigation, the
auth banner); their data comes from the `/v1` API, fetched by a little plain
JavaScript under `static/` with the user's API key. Nothing here decides
anything: every act is a `/v1` call, checked there. Imported only by
services.gateway.app.

Security (see guard.py): strict CSP with no inline script, framing refused,
and a same-origin check on every unsafe request.
"""

from services.gateway.console.install import install

__all__ = ["install"]
