"""Evaluation: mIoU of proposals against labelled images, and how much annotators changed them.

- ``metrics``: mmsegmentation's ``IoUMetric`` formula on one confusion matrix.
- ``groundtruth``: the shape every ground-truth source is read into.
- ``datasets``: the standard benchmark layouts, described as data (one table).
- ``sources``: a Label Studio export or project, a COCO file.
- ``protocols``: per-dataset method settings of the NACLIP and TCL protocols, as data.
- ``predictions``: label maps from methods or from PNG folders; saved, resumed.
- ``run``: the ``eval`` job (``jobs.py`` shape); ``report``: table, JSON, charts.
- ``agreement``: annotations that started from a prediction vs the prediction.
"""
