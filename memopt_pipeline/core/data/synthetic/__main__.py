from memopt_pipeline.core.data.synthetic.cli import main

raise SystemExit(main())
