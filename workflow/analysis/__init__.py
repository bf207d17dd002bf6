"""Loss-network attributes, correlations, Pareto fronts, figures."""
