"""Parts of ``python -m tools.compare_routers``: toy tasks, router specs, training, NMI, LM runs, report."""
