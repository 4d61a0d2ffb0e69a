from .curves import dev_curve, plateau_checks, plateau_miss, stage_plan  # noqa: F401  (report.stage_plan(run_dir), ...)
