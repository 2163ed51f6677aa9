"""Experiments across runs: sweeps that train many runs (``sweep``), reports that compare them
(``report``, ``plots``), and the text/Markdown tables both print (``table``)."""
