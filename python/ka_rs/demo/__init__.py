"""The demo (``ka-rs demo``) and the loss ablation (``ka-rs ablate``), one job per file.

- :mod:`~ka_rs.demo.config`: :class:`DemoConfig` (``[demo]``, ``[teacher.*]``, ``[student.*]``),
  :func:`load_demo_config`, the ``--quick`` overrides;
- :mod:`~ka_rs.demo.teachers`: training the teachers once and caching them
  (:func:`ensure_teachers`, :func:`teacher_key`, :func:`default_cache_dir`);
- :mod:`~ka_rs.demo.student`: training the student (in this process or DDP workers) and caching
  its result for the ablation;
- :mod:`~ka_rs.demo.jobs`: the process pool (:class:`Job`, :func:`run_jobs`, worker setup,
  :func:`student_processes`);
- :mod:`~ka_rs.demo.evaluation`: the held-out images, :func:`evaluate_on_test`, the
  :class:`TeacherEnsemble` reference;
- :mod:`~ka_rs.demo.report`: ``results.json``, ``report.md``, figures, the rich table;
- :mod:`~ka_rs.demo.run`: :func:`run_demo`, the steps above in order;
- :mod:`~ka_rs.demo.ablate`: :func:`run_ablation` and its variants.
"""

from ka_rs.demo.ablate import VARIANTS, ablation_markdown, ablation_table, run_ablation
from ka_rs.demo.config import (
    DEMO_DEFAULTS,
    QUICK_OVERRIDES,
    DemoConfig,
    DemoSettings,
    apply_demo_overrides,
    load_demo_config,
)
from ka_rs.demo.evaluation import (
    DemoEvaluation,
    TeacherEnsemble,
    eval_dataset,
    evaluate_demo,
    evaluate_on_test,
    evaluate_teachers,
)
from ka_rs.demo.jobs import Job, resolve_workers, run_jobs, student_processes
from ka_rs.demo.report import build_results, render_figures, render_report, results_table
from ka_rs.demo.run import run_demo
from ka_rs.demo.student import StudentRun, student_key, train_student, write_student_cache
from ka_rs.demo.teachers import TeacherRun, default_cache_dir, ensure_teachers, teacher_key

__all__ = [
    "DEMO_DEFAULTS",
    "QUICK_OVERRIDES",
    "VARIANTS",
    "DemoConfig",
    "DemoEvaluation",
    "DemoSettings",
    "Job",
    "StudentRun",
    "TeacherEnsemble",
    "TeacherRun",
    "ablation_markdown",
    "ablation_table",
    "apply_demo_overrides",
    "build_results",
    "default_cache_dir",
    "ensure_teachers",
    "eval_dataset",
    "evaluate_demo",
    "evaluate_on_test",
    "evaluate_teachers",
    "load_demo_config",
    "render_figures",
    "render_report",
    "resolve_workers",
    "results_table",
    "run_ablation",
    "run_demo",
    "run_jobs",
    "student_key",
    "student_processes",
    "teacher_key",
    "train_student",
    "write_student_cache",
]
