"""How users run the system: multi-node training launch, Ray preprocessing submission, the MLflow UI, the demo.

Each module is also a command (`python -m launch.train …`); the Makefile targets call them.
"""
