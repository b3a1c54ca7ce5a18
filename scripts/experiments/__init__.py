"""Code the experiment scripts share (`records`) and the reproduction's paper-shaped outputs (`paper_tables`).

Scripts run as `python scripts/<name>.py`, which puts `scripts/` first on `sys.path`: `import experiments` needs no
path editing. Library code never imports this package.
"""
