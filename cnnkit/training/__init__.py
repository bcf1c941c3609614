"""The training toolkit: recipes, data sets, the model zoo, training runs, evaluation and export."""
