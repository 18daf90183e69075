"""`charlm serve`: a local web playground and JSON API over the models in ./checkpoints.

    pool.py     concurrent generations on one model stepped as one batch
    models.py   the models and runs on offer, by name; loaded on first use
    app.py      the Starlette app: the page and the API, with its limits
    run.py      binding, the URL, uvicorn until Ctrl-C
    playground.html/.js/.css   the page (no CDN, no inline script)

Needs the `serve` extra (starlette, uvicorn); nothing here imports them until the server starts.
"""
