"""Building blocks shared by several primitives (private).

Each module here is a leaf: it imports only the standard library, :mod:`fastinfer.errors` and,
lazily, torch. Primitives import from here instead of keeping their own copy, so a rule (how a
percentile is read, which tolerance a dtype gets, how a file is published) has one definition.

- :mod:`.quantiles`: one percentile definition and the summary every ``statistics()`` uses;
- :mod:`.tolerances`: per-dtype ``(rtol, atol)`` for every "same as eager" check;
- :mod:`.files`: atomic file writes (temp file in the same folder, renamed; removed on error);
- :mod:`.tables`: plain-text tables for reports;
- :mod:`.timing`: interleaved timing of alternatives, and a budgeted race with early elimination;
- :mod:`.export`: how a statistics field declares the metric it is exported as;
- :mod:`.manifest`: the environment a compiled artefact or a measured decision depends on (uses
  the ``_env`` and ``_torch_compat`` leaves);
- :mod:`.keys`: cache keys for decisions (a model's structure without its weights, shape classes).
"""
