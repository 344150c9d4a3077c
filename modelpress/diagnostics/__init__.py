"""Stages that measure instead of compressing (they join a recipe like any method)."""
