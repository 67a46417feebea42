"""The model: an ensemble of members with its head, standardisation, adversarial term,
predictions and metrics, and the checks for user input that every layer shares."""
