"""Parts of ``python -m tools.router_toys.compare``: toy tasks, router specs, training, NMI, LM runs, report."""
