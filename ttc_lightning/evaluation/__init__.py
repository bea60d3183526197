"""Evaluation: the evaluator (sample, score, gather, write), records into the tasks' metrics, the metric formulas."""
