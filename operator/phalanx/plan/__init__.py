"""The pure decision layer: observed world in, a plan out, one module per concern.

- `trainjob`: the life of an LLMTrainJob (finish, suspend, deadline, failures, success, gang).
- `inference`: one InferenceService reconcile, from `model_source`, `groups`, `rollout` and
  `autoscale`.

Nothing here talks to the API server or reads the clock; the shell (`phalanx.handlers`)
observes, calls these and applies the result.
"""
