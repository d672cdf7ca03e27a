"""Pure renderers: spec (+ placement) in, desired Kubernetes objects out."""
