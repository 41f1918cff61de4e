"""Evaluation: greedy (or sampled) rollouts under a pinned protocol (``evaluate.py``,
``protocol.py``), and the reports that state it with every number (``report.py``,
``report_html.py``)."""
