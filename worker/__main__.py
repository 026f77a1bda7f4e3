from cortex.worker.main import main

main()
