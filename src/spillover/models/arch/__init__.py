"""Architecture descriptions: what a model is, from its config alone, without torch.

One file per architecture (`<name>.py`, its class in `ARCH`), the contract in `base.py`. The planner, the
estimate and the file readers (loading/source.py) read these; the nn.Modules (`models/<name>.py`) are built on
them. Nothing here imports torch: `spillover plan` never does (tests/test_cli_plan.py checks it).
"""
