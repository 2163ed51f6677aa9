"""The data path: records from files and the hub (``sources``), records to token ids and labels
(``formatting``), tokenized rows and their cache (``examples``), the length limit and packing
(``packing``), the step-indexed example stream and collation (``batching``)."""
