from vmagent.cli import main

raise SystemExit(main())
