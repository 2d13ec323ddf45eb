"""Streaming drift detectors for chapter 9.4 (model drift detection). Pure computation, no I/O.

- :mod:`.statistical` — KS two-sample test, KL divergence, PSI on quantile bins, Mann-Kendall trend test.
- :mod:`.monitors` — per-feature z-score monitor, multi-scale sudden/gradual detector (exercise 9.4).
- :mod:`.quality` — concept drift from labels (window accuracy + river's ADWIN), ECE, text-quality monitor.
"""

from lockgate.tasks.monitoring.detectors.monitors import (
    ChangeFit,
    FeatureDrift,
    FeatureDriftMonitor,
    FeatureDriftReport,
    MultiScaleDriftDetector,
    MultiScaleResult,
    classify_change,
    drift_severity,
)
from lockgate.tasks.monitoring.detectors.quality import (
    CalibrationResult,
    ConceptDriftMonitor,
    ConceptDriftStatus,
    TextQuality,
    TextQualityMonitor,
    calibration_error,
    text_quality,
)
from lockgate.tasks.monitoring.detectors.statistical import (
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    MannKendallResult,
    PsiResult,
    TestResult,
    kl_divergence,
    ks_two_sample,
    mann_kendall,
    population_stability_index,
    quantile_bin_edges,
)

__all__ = [
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "CalibrationResult",
    "ChangeFit",
    "ConceptDriftMonitor",
    "ConceptDriftStatus",
    "FeatureDrift",
    "FeatureDriftMonitor",
    "FeatureDriftReport",
    "MannKendallResult",
    "MultiScaleDriftDetector",
    "MultiScaleResult",
    "PsiResult",
    "TestResult",
    "TextQuality",
    "TextQualityMonitor",
    "calibration_error",
    "classify_change",
    "drift_severity",
    "kl_divergence",
    "ks_two_sample",
    "mann_kendall",
    "population_stability_index",
    "quantile_bin_edges",
    "text_quality",
]
