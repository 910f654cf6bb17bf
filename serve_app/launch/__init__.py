"""`make run`'s launcher (`python -m serve_app.launch CONFIG`): checks, a loopback-only local Ray
cluster, `serve run` supervised, a clean stop. Runs in the user's shell: no torch, no Ray import."""
