"""Serving: a tandem behind an image API (``tandem serve``).

:class:`~tandem.serve.engine.Engine` runs Algorithm 1 across requests, each stage batching on its own;
:mod:`~tandem.serve.controller` caps the teacher's share by the load; :func:`~tandem.serve.app.create_app` is the
HTTP API (OpenAI's image endpoints, health, metrics, a playground); :mod:`~tandem.serve.profile` measures the
stages offline. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""
