from pacrecon.cli import main

raise SystemExit(main())
