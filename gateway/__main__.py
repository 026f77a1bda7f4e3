from cortex.gateway.main import main

main()
