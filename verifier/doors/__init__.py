"""Front doors: each translates one wire protocol into `RequestAttributes` and a `Decision` back."""
