"""One module per benchmark: wires data, model, loss network, harness and metrics together."""
