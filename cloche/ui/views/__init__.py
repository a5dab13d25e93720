"""What each page shows, as JSON-ready dicts, computed through the public model API only.

One module per page (``model``, ``unit``, ``text``, ``intervene``, ``contexts``, ``head``);
none of them knows about HTTP, so they are tested and benchmarked without a browser. Functions
that run next to the model (inside ``model.call`` or as probes) import what they need inside
themselves, so cloudpickle can ship them to a server.
"""
