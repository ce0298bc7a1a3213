"""leasectl benchmarks: figures for speed, scale and survival, measured side by side.

``python -m bench --quick|--full [--only NAME] [--pg-url URL]`` runs them (``make bench-quick``,
``make bench``); ``python -m bench.soak --minutes 5`` runs the chaos soak alone. Each benchmark prints
one JSON object per line (name, parameters, figures, machine), then a short table. Benchmarks are
never timed tests: nothing here asserts on a duration.
"""
