"""The clinician and auditor web pages, served by the BentoML service under ``/ui``.

Plain HTML, CSS and JavaScript modules in ``static/``, bundled with the package: nothing
is fetched from another origin at run time (the pages' Content-Security-Policy forbids it).
The pages call the same JSON API as any other client (CONTRACT §8), with the API key the
user signs in with; this package only serves files and the form description
(:mod:`recommender.web.fields`). It does not import ``bentoml``:
:mod:`recommender.service` mounts :data:`ui_app`.
"""

from recommender.web.app import UI_PATH, ui_app

__all__ = ["UI_PATH", "ui_app"]
