from sglora_client.cli import main

raise SystemExit(main())
