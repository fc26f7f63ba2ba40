"""The outage demo: one command that shows an example app riding out a Redis crash.

``scripts/demo`` (or ``python -m demo``) starts a throw-away redis-server, runs an example
app (``examples.starlette_app`` under uvicorn, or ``examples.flask_app`` under gunicorn)
against it, drives traffic, SIGKILLs Redis for a while, restarts it, and reports what the
clients saw: requests served, HTTP errors, latency per phase, breaker transitions,
fallbacks, retries and write-behind replay, plus the trace of one degraded request and a PNG
timeline. Modules:

- :mod:`demo.run`: command line and orchestration;
- :mod:`demo.processes`: the app-server subprocess (the redis-server is the tests' own
  :class:`testbed.RedisServer`);
- :mod:`demo.traffic`: the load driver, the ``/health`` poller and the ``/metrics`` scraper;
- :mod:`demo.report`: turning what was recorded into the report (dict, Markdown, checks);
- :mod:`demo.timeline`: the PNG timeline;
- :mod:`demo.otlp_receiver`: a real OTLP/HTTP receiver (also used by the tests).
"""
