"""The demo (``ka-rs demo``) and the loss ablation (``ka-rs ablate``), one job per file.

- :mod:`~ka_rs.demo.config`: :class:`DemoConfig` (``[demo]``, ``[teacher.*]``, ``[student.*]``),
  :func:`load_demo_config`, the ``--quick`` overrides;
- :mod:`~ka_rs.demo.teachers`: training the teachers once and caching them
  (:func:`ensure_teachers`, :func:`teacher_key`, :func:`default_cache_dir`);
- :mod:`~ka_rs.demo.student`: training the student (in this process or DDP workers) and caching
  its result for the ablation;
- :mod:`~ka_rs.demo.seeds`: the demo's extra student seeds and their mean ± sd
  (:func:`seed_statistics`);
- :mod:`~ka_rs.demo.stats`: the seed list, mean ± sd, paired t-intervals
  (:func:`student_seeds`, :func:`summarize`, :func:`paired_difference`);
- :mod:`~ka_rs.demo.jobs`: the process pool (:class:`Job`, :func:`run_jobs`, worker setup,
  :func:`student_processes`);
- :mod:`~ka_rs.demo.evaluation`: the held-out images, :func:`evaluate_on_test`, the
  :class:`TeacherEnsemble` reference;
- :mod:`~ka_rs.demo.report`: ``results.json``, ``report.md``, figures, the rich table;
- :mod:`~ka_rs.demo.run`: :func:`run_demo`, the steps above in order;
- :mod:`~ka_rs.demo.ablate`: :func:`run_ablation`, its variants and their paired
  comparisons over seeds.
"""

from ka_rs.demo.ablate import (
    COMPARISONS,
    VARIANTS,
    ablation_markdown,
    ablation_table,
    plot_ablation,
    run_ablation,
)
from ka_rs.demo.config import (
    DEMO_DEFAULTS,
    QUICK_OVERRIDES,
    TEACHER_SPLITS,
    DemoConfig,
    DemoSettings,
    apply_demo_overrides,
    flag_overrides,
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
from ka_rs.demo.seeds import seed_statistics
from ka_rs.demo.stats import (
    SEED_LIST,
    fmt_interval,
    fmt_mean_sd,
    paired_difference,
    student_seeds,
    summarize,
    t_quantile,
)
from ka_rs.demo.student import StudentRun, student_key, train_student, write_student_cache
from ka_rs.demo.teachers import TeacherRun, default_cache_dir, ensure_teachers, teacher_key

__all__ = [
    "COMPARISONS",
    "DEMO_DEFAULTS",
    "QUICK_OVERRIDES",
    "SEED_LIST",
    "TEACHER_SPLITS",
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
    "flag_overrides",
    "fmt_interval",
    "fmt_mean_sd",
    "load_demo_config",
    "paired_difference",
    "plot_ablation",
    "render_figures",
    "render_report",
    "resolve_workers",
    "results_table",
    "run_ablation",
    "run_demo",
    "run_jobs",
    "seed_statistics",
    "student_key",
    "student_processes",
    "student_seeds",
    "summarize",
    "t_quantile",
    "teacher_key",
    "train_student",
    "write_student_cache",
]
