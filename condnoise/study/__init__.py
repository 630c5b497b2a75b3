"""Studies: a grid of corrupt -> train -> sample -> evaluate cells, cached per
cell under the hash of its resolved config, resumable, with an HTML / Markdown / CSV report.

Entry points: :func:`condnoise.study.spec.load_study`, :func:`condnoise.study.runner.run_study`,
:func:`condnoise.study.report.write_report`; CLI ``condnoise study`` and ``condnoise demo``.
"""
