"""Reproductions of the paper's findings at CPU scale; each writes into reports/.

``python -m nanotune.reproduce [--out reports]`` runs every experiment here.
"""
