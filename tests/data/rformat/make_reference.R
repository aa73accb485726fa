# R 4.x's own formatting of numbers, the reference for henderson.rprint (tests/test_rprint.py).
# Run once, by hand, where R is installed; the tests never run it:
#   Rscript tests/data/rformat/make_reference.R > tests/data/rformat/cases.jsonl
set.seed(20261126)
num <- function(x) ifelse(is.na(x), "null", sprintf("%.17g", x))
str <- function(s) paste0('"', gsub('"', '\\\\"', gsub("\\\\", "\\\\\\\\", s)), '"')
arr <- function(v, f) paste0("[", paste(f(v), collapse = ","), "]")
emit <- function(kind, ...) {
  fields <- list(...)
  body <- paste(mapply(function(k, v) paste0(str(k), ":", v), names(fields), fields), collapse = ",")
  cat(paste0('{"kind":', str(kind), ",", body, "}\n"))
}
draw <- function(n) {
  scale <- 10^sample(-6:7, 1)
  x <- rnorm(n) * scale * exp(rnorm(n, sd = sample(c(0.1, 1, 3), 1)))
  if (runif(1) < 0.3) x <- round(x, sample(0:4, 1))
  if (runif(1) < 0.2) x[sample(n, 1)] <- 0
  if (runif(1) < 0.1) x[sample(n, 1)] <- NA
  x
}
for (i in 1:400) {
  x <- draw(sample(1:6, 1)); d <- sample(2:7, 1)
  emit("format", x = arr(x, num), digits = d, out = arr(format(x, digits = d), str))
}
for (i in 1:150) {
  x <- round(draw(sample(1:6, 1)), sample(0:5, 1)); d <- sample(2:4, 1)
  emit("format_nsmall", x = arr(x, num), digits = d, out = arr(format(round(x, d), nsmall = d), str))
}
for (i in 1:300) {
  p <- 10^(-runif(sample(1:5, 1), 0, sample(c(2, 5, 20, 40), 1)))
  if (runif(1) < 0.2) p[1] <- 1e-300
  emit("pval", p = arr(p, num), digits = 3, out = arr(format.pval(p, digits = 3), str))
}
coefmat <- function(p, df) {
  est <- rnorm(p) * 10^sample(-3:3, p, replace = TRUE)
  se <- abs(est) / abs(rnorm(p, sd = sample(c(1, 5, 50), 1))) + 10^sample(-4:1, 1)
  tv <- est / se
  if (df) {
    ddf <- exp(runif(p, 0.5, 8))
    m <- cbind(Estimate = est, "Std. Error" = se, df = ddf, "t value" = tv,
               "Pr(>|t|)" = 2 * pt(-abs(tv), ddf))
  } else m <- cbind(Estimate = est, "Std. Error" = se, "t value" = tv)
  rownames(m) <- c("(Intercept)", paste0("x", seq_len(p - 1)))[seq_len(p)]
  m
}
for (i in 1:200) {
  df <- runif(1) < 0.7
  m <- coefmat(sample(1:6, 1), df)
  out <- capture.output(printCoefmat(m, digits = 4, signif.stars = TRUE))
  emit("coefmat", rows = arr(rownames(m), str), cols = arr(colnames(m), str),
       values = arr(as.vector(t(m)), num), out = arr(out, str))
}
names <- c("(Intercept)", "Days", "serviceTRUE", "dept2", "service1:dept2", "age", "SexFemale",
           "x", "I(x^2)", "poly(x, 2)1", "log(dose)", "treatmentplacebo", "Days:SexMale",
           "cyl", "hp", "factor(time)3", "a", "ab", "scale(x)", "Intercept", "y ~ x", "x.y_z")
emit("abbreviate", names = arr(names, str), minlength = 6, out = arr(unname(abbreviate(names, minlength = 6)), str))
emit("abbreviate", names = arr(names, str), minlength = 11, out = arr(unname(abbreviate(names, minlength = 11)), str))
for (i in 1:100) {
  r <- rnorm(sample(5:300, 1)) * exp(rnorm(1)) + rnorm(1, sd = 0.1)
  q <- setNames(zapsmall(quantile(r), 5), c("Min", "1Q", "Median", "3Q", "Max"))
  emit("quantiles", x = arr(r, num), out = arr(capture.output(print(q, digits = 4)), str))
}
# wide tables: R wraps a printed matrix at 80 columns
words <- c("treatment", "high", "dose", "interaction", "level", "x", "covariate", "B")
for (i in 1:60) {
  p <- sample(2:5, 1)
  m <- coefmat(p, runif(1) < 0.7)
  rownames(m) <- make.unique(sapply(seq_len(p), function(j)
    paste(sample(words, sample(1:6, 1), replace = TRUE), collapse = sample(c(" ", ":", "_"), 1))))
  out <- capture.output(printCoefmat(m, digits = 4, signif.stars = TRUE))
  emit("coefmat", rows = arr(rownames(m), str), cols = arr(colnames(m), str),
       values = arr(as.vector(t(m)), num), out = arr(out, str))
}
for (i in 1:60) {
  r <- sample(1:4, 1); k <- sample(1:14, 1)
  cells <- matrix(replicate(r * k, strrep("x", sample(1:12, 1))), r, k)
  rownames(cells) <- replicate(r, strrep("r", sample(0:15, 1)))
  colnames(cells) <- replicate(k, strrep("c", sample(0:9, 1)))
  right <- runif(1) < 0.5
  emit("matrix", rows = arr(rownames(cells), str), cols = arr(colnames(cells), str),
       cells = arr(as.vector(t(cells)), str), right = if (right) "true" else "false",
       out = arr(capture.output(print(cells, quote = FALSE, right = right)), str))
}
