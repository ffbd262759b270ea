"""Checks of the shipped traces against the live model, run with the baselines' policies: the deviation budgets
calibrated to an accuracy loss (:mod:`~baselines.model_checks.calibrate`) and the accuracy rule's agreement with
the live model (:mod:`~baselines.model_checks.agreement`). Both need torch (extra ``train``)."""
