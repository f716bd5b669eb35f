"""Click commands of ``ovss-label``, one module per command family; each command stays thin."""
