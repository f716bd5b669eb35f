"""Models, proposers, training and the Label Studio ML-backend server.

Torch is imported here and only here; nothing in this package loads weights at import time.
"""
