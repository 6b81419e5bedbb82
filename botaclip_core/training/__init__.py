"""BotaCLIP and BotaSP training: data, the shared epoch loop, the adapter and the pixel modes."""
