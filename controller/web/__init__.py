"""The daemon's read-only status page: queries, access control, rendering, templates and assets.

``page.StatusPage`` is what the daemon's HTTP handler calls for ``/``, ``/leases/NAME`` and
``/static/FILE``; ``queries`` reads the database, ``access`` decides who may read, ``runtime``
carries what only the running daemon knows. ``templates/`` and ``static/`` ship in the wheel.
"""
