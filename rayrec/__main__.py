from rayrec.cli import main

raise SystemExit(main())
