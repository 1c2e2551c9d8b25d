"""The benchmark: prompt sets (``prompts``), methods side by side (``methods``, ``runner``), and
the table, JSON and plot (``report``). ``mtpspec bench`` in ``cli`` wires them together."""
